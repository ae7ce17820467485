"""The `kd` command line (installed as the `kd_cli` package). Thin: every command calls library code."""
