"""ftlaunch: a fault-tolerant distributed training launcher for PyTorch."""
