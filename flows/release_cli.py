"""`ryz release start|status|pause|resume|promote|abort|rollback`: canary releases (docs/release.md)."""

from __future__ import annotations

import sys
import time

from engine.artifacts.releases import OWNED, stale_for
from engine.settings import get_settings
from flows.cli_common import print_json as _print_json
from flows.cli_common import store as _store
from flows.cli_common import when as _when


def _releases():
    from engine.artifacts.releases import ReleaseStore

    return ReleaseStore(_store())


def _release_flow(**kw) -> dict:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.release import release

    return release(**kw)


def _print_release(rel: dict | None, as_json: bool) -> None:
    if as_json:
        _print_json(rel)
        return
    if rel is None:
        print("no releases yet")
        return
    step = rel["steps"][min(rel["step_index"], len(rel["steps"]) - 1)]
    print(f"release {rel['id']}: {rel['ref']} {rel['status']} (next step {step}% of {rel['steps']})")
    if (lease := rel.get("lease")) and rel["status"] in OWNED:
        dead = stale_for(rel, get_settings().release_lease_s)
        state = (
            f"STALE: no heartbeat for {dead:.0f} s, its flow died; `ryz release abort` or `resume` takes over"
            if dead
            else f"heartbeat {time.time() - lease['heartbeat']:.0f} s ago"
        )
        print(f"  run by {lease['owner']}: {state}")
    if rel["status"] == "baking" and (watch := rel.get("watch")):
        print(f"  watching production until {_when(watch['until'])} against the previous one's figures")
    if fleet := rel.get("fleet"):
        print(f"  on the replicas: canary {str(fleet['canary'])[:19]} at {fleet['weight']}%")
    for e in rel["log"]:
        print(f"  {_when(e['time'])}  {e['event']:<18} {e['reason']}")


def cmd_release(args) -> int:
    import getpass

    releases = _releases()
    actor = f"user:{getpass.getuser()}"
    action = args.release_command
    if action == "start":
        from engine.artifacts.registry import Registry, refuse_pulled

        refuse_pulled(Registry(_store()).get(args.ref), "be released")  # at once, before Prefect starts
        rel = _release_flow(ref=args.ref, synthetic_load=args.synthetic_load or None)
    elif action == "status":
        rel = releases.get(args.id) if args.id else releases.latest()
    elif action == "pause":
        rel = _current(releases, ("canary",))
        rel = releases.set_status(rel["id"], "pause_requested", f"pause requested by {actor}")
    elif action == "resume":  # a paused release, or one whose flow died (the flow refuses a live one)
        rel = releases.get(args.id) if args.id else _current(releases, ("paused", *OWNED))
        rel = _release_flow(release_id=rel["id"], synthetic_load=args.synthetic_load or None)
    elif action == "promote":
        rel = _current(releases, ("paused", "canary"))
        if not args.force and rel["step_index"] < len(rel["steps"]):
            print(
                f"ryz release promote: {rel['ref']} has passed {rel['step_index']} of {len(rel['steps'])} canary "
                f"steps; "
                "`ryz release resume` runs the rest, `--force` promotes now",
                file=sys.stderr,
            )
            return 1
        rel = _release_flow(release_id=rel["id"], force_promote=True)
    elif action == "abort":
        from tasks.release import abort_actions, resolve_fleet

        rel = _current(releases, ("paused", "degraded", *OWNED))
        reason = args.reason or f"aborted by {actor}"
        dead = stale_for(rel, get_settings().release_lease_s)
        if rel["status"] in OWNED and not dead:  # a live flow is stepping it: it aborts at its next check
            rel = releases.set_status(rel["id"], "abort_requested", reason)
        else:  # paused, or its flow died: abort here, on every replica and in the registry
            if dead:
                reason += f" (its flow had not been seen for {dead:.0f} s)"
            abort_actions(rel["id"], rel["ref"], reason, actor, resolve_fleet())
            rel = releases.get(rel["id"])
    else:  # rollback
        from tasks.release import resolve_fleet, rollback_production

        result = rollback_production(actor, args.reason or f"rollback by {actor}", resolve_fleet())
        if args.json:
            _print_json(result)
        else:
            print(f"production is {result['production']} again; {result['rolled_back']} is rolled_back")
        return 0
    _print_release(rel, args.json)
    return 0 if rel is None or rel["status"] not in ("rejected", "aborted", "failed") else 2


def _current(releases, statuses: tuple[str, ...]) -> dict:
    from engine.errors import ModelReferenceError

    rel = releases.latest()
    if rel is None or rel["status"] not in statuses:
        state = f"the latest release is {rel['ref']} {rel['status']}" if rel else "there are no releases"
        raise ModelReferenceError(f"no release in state {'/'.join(statuses)}: {state}")
    return rel


def add_release_commands(sub, command) -> None:
    """Add these commands to `ryz`'s subparsers (`command(name, handler, help)` makes one with --json)."""
    release = sub.add_parser(
        "release", help="canary releases: start, status, pause, resume, promote, abort, rollback"
    ).add_subparsers(dest="release_command", required=True)
    for name, help_ in (
        ("start", "release a registry version: offline gates, canary steps, promotion"),
        ("status", "the latest release (or one by id) and its log"),
        ("pause", "pause the running release at its next check"),
        ("resume", "continue a paused release (or one whose flow died) from its recorded step"),
        ("promote", "promote the current release now (--force skips the remaining steps)"),
        ("abort", "abort the current release: canary weight 0 and unloaded, status rolled_back"),
        ("rollback", "undo the last promotion: `previous` serves as production again"),
    ):
        p = release.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=cmd_release)
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        if name == "start":
            p.add_argument(
                "ref",
                help="a registered candidate: name:version (ryz-demo-m:1) or an alias (production, canary, previous)",
            )
        if name in ("status", "resume"):
            p.add_argument("id", nargs="?", help="a release id (default: the latest)")
        if name in ("start", "resume"):
            p.add_argument(
                "--synthetic-load", action="store_true", help="drive bounded synthetic traffic during the steps"
            )
        if name == "promote":
            p.add_argument("--force", action="store_true", help="promote without running the remaining canary steps")
        if name in ("abort", "rollback"):
            p.add_argument("--reason", help="recorded in the registry history")
