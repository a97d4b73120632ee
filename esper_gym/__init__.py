"""esper-gym: Gymnasium environments for morphogenetic training."""

__version__ = "0.1.0"
