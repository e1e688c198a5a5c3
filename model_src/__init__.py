"""What SageMaker receives as source_dir: the training entry point (train.py), the inference
handlers (inference.py) and the modules they share. The orchestrating process imports only the
torch-free ``model_src.cifar``."""
