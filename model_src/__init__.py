"""What SageMaker receives as source_dir: the training entry point (train.py), the inference
handlers (inference.py) and the modules they share. The orchestrating process imports only
``model_src.contract``, the torch-free module of what the container and the orchestrator
agree on."""
