"""Reading inputs: listing, credentials, decoding images and (``video.py``) streaming video frames."""
