"""Plain PyTorch references: the specification of every op. Every faster backend is tested
against these. They favour clarity over speed and run on any device."""
from .kv_rollback import kv_rollback

__all__ = ["kv_rollback"]
