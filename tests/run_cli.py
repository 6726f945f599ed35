"""The posttrain CLI with the test-only `coin` task registered (for subprocess tests)."""

import coin_task  # noqa: F401

from posttrain.cli import main

main()
