"""Data: examples as rows of shared tensors, partitioners, federated datasets, built-in tasks."""

from . import partition
from .arrays import ArrayData
from .federated import ClientData, FederatedDataset, federate
from .tasks import Task, load_task, register_task, task_names, task_options

__all__ = ["ArrayData", "ClientData", "FederatedDataset", "Task", "federate", "load_task",
           "partition", "register_task", "task_names", "task_options"]
