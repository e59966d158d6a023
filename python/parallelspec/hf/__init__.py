"""The transformers adapter: the target model seen through ps_kernels (``target``), few-row
linears routed to the native kernel (``linear``), and the drop-in ``generate`` / ``patch`` /
``custom_generate`` (``generate``)."""
