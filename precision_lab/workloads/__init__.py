"""What a suite trains: the built-in models, their datasets and the stress scenarios.

Imports torch and scikit-learn only; everything else in precision_lab may import it.
"""
