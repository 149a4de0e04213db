"""Text generation: with the whole model on this machine (``local``) or split across a trunk (``split``)."""
