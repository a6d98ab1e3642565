"""The torch-free edge runtime (``EdgeDetector``). Arrives with the export issue; imports only numpy, OpenCV and a backend."""
