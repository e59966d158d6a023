"""The transformers adapter: the target model seen through ps_kernels (``target``), few-row
linears routed to the native kernel (``linear``), and the drop-in ``generate`` / ``patch`` /
``custom_generate`` (``generate``), and the architectures it runs (``architectures``: one table;
``check_target(model)`` refuses any other before work starts)."""
from .architectures import ARCHITECTURES, check_target

__all__ = ["ARCHITECTURES", "check_target"]
