from memflow_train.errors import run_command
from memflow_train.generation.cli import main

run_command(main)
