"""The web dashboard at ``/ui``: its page and assets (``static/``), the live feed its
tabs read (``feed.py``), the charts' recent history (``activity.py``) and the routes
(``routes.py``)."""
