"""gpuq producer: the AWS Lambda package that turns events into jobs on Redis lists."""
