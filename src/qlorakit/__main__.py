from qlorakit.cli import run

run()
