from bn_research.cli import run

run()
