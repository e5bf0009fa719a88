"""The Open Inference Protocol over gRPC: KServe's / Triton's `inference.GRPCInferenceService`,
a thin adapter over the same request path as the REST V2 routes (service.inference.Requests).

inference.proto is the contract; inference_pb2*.py(i) are generated from it (README.md here
says how). messages.py turns requests into images or arrays and answers into tensors,
servicer.py serves the calls, server.py runs a grpc.aio server beside uvicorn.
"""
