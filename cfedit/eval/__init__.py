"""``cfedit eval``: the independent reader, the evaluation run, the report and its renderers."""
