"""memflow-train entry point: python train.py fit --config configs/demo.yaml (see README.md)."""

from memflow_train.cli import run

if __name__ == "__main__":
    run()
