"""What SageMaker receives as source_dir: the CIFAR-10 entry script (cifar10.py)."""
