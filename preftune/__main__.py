from preftune.cli import run

run()
