"""MLflow tracking: the ``Tracker`` (``tracker``), what ctexp names params and metrics (``names``), and
tracking URIs, masking and failures (``uris``)."""
