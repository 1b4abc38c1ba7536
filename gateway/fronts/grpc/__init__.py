"""The KServe V2 gRPC front: Triton's ``GRPCInferenceService`` over ``grpc.aio``, translated to the service."""
