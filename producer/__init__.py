"""gpuq producer: the AWS Lambda package that turns events into jobs on Redis lists.

It is also the shared core: the job model and its rules (``job.py``), every Redis key (``keys.py``), the
push script (``enqueue.py``) and the store connections (``connect.py``) live here because this package is
deployed alone, as the Lambda built from ``template.yaml`` (``CodeUri: producer/``), and must carry them
without the dispatcher. The dispatcher imports ``producer``; ``producer`` never imports ``dispatcher``, so
both sides agree on a job and a key by running the same code, and the Lambda stays small.
"""
