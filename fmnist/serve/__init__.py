"""Online predictions: the model behind Ray Serve, over HTTP."""
