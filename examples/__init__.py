"""Examples of user code run by the launcher (``examples.my_trainer:MyTrainer``)."""
