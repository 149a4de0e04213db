"""The trunk protocol, written once for both ends: the generated gRPC code (``proto``), the
tensor wire format (``wire``), settings messages (``messages``), the trunk-state format
(``state``), error classification (``errors``), the client (``client``), the autograd seam
and compatibility checks (``trunk``), and a helper that starts a trunk process (``process``)."""
