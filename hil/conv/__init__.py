"""The hybrid convolutional network of thesis chapter 4: the network, its image data, the end-to-
end deployment on a bench and its report.
"""
