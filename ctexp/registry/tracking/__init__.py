"""MLflow tracking: the ``Tracker`` (``tracker``), what ctexp names params and metrics (``names``), a run's
Markdown description (``describe``), the activation store as a dataset input (``datasets``), and tracking
URIs, masking and failures (``uris``)."""
