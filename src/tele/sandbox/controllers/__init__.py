"""The sandbox's controller manager: workloads to pods, Services to endpoints, budgets."""
