"""gRPC servicers and process wiring: they translate, the core decides."""
