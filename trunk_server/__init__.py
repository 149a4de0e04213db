"""The trunk server: hosts the middle blocks of a split model for many client sessions over gRPC."""
