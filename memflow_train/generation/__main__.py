from memflow_train.generation.cli import main

main()
