"""The command line: ``recpost fit | validate | test | predict`` (LightningCLI), ``experiment``, ``bench``,
``export``, ``recommend`` and the helpers only a command uses (flag checks, console output, the callbacks
every ``recpost fit`` gets). ``recpost.cli:main`` is the console script."""

from recpost.cli.main import MetricsWriter, PredictionWriter, main

# The writers keep their public class paths (``recpost.cli.MetricsWriter``): every run folder's
# config.yaml names them, and those files stay re-runnable.
__all__ = ["MetricsWriter", "PredictionWriter", "main"]
