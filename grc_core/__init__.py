"""grc_core: the pure torch/numpy core of the GRC pipeline.

It imports neither prefect, dvc, great_expectations nor yaml (a test checks this);
`tasks/` does the I/O and calls in here.

Shape legend, used in `# (...)` comments on every line that changes a shape:
    N  items in the catalog
    U  users
    B  batch (users or instances)
    W  beam width
    G  group size (GRPO episodes per user)
    L  semantic-ID levels (the disambiguation level included where stated)
    K  codes per level (codebook size)
    T  history length
    D  model width / embedding dimension
    V  vocabulary (of one output head)
"""
