"""jinja2 templates of the evaluation reports (a package so setuptools ships the *.j2 files)."""
