"""The Streamlit script of the web interface: the pages (see :mod:`ui.pages`).

Served by the application in ``ui/app.py``, which ``ichnode ui`` starts.
"""

from ui.pages import main

main()
