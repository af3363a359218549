"""The serving wing: the OpenAI-compatible engine a host runs.

Owns the engine core, scheduler, sampling, text streaming and stop strings, chat templates, structured output and
tools, the FastAPI app with its OpenAI, admin and retrieval routes, the canary router and analysis, metrics, the
MCP server, and the local server/load helpers the release flow drives. It is the last wing: it may import every
other, and nothing in `engine/` imports it (docs/architecture.md).
"""
