"""The hybrid convolutional network of thesis chapter 4: the network (network.py), its image data
(images.py), its training job (jobs.py), the end-to-end deployment on a bench, step by step
(hybrid.py), and its report (report.py).
"""
