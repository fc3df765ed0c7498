"""The commands behind the CLI: each a spec, a `check` and a `run` (`command`), writing a run directory."""
