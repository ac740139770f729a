"""tfsft: fine-tune pretrained image classifiers with TensorFlow and Keras 3.

Importing the package is cheap: TensorFlow is imported only by the modules that train,
evaluate or export, so the CLI answers config questions in well under a second.
"""

__version__ = "0.1.0"
