"""The sandbox node agent: runs pods as processes in network namespaces of their own."""
