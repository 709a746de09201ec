import os
import sys

# Lets test modules share reference helpers (e.g. test_reference_kernel imports test_cp_conv).
sys.path.insert(0, os.path.dirname(__file__))
