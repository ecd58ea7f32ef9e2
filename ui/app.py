"""Entry point of the web interface for ``streamlit run`` (see ``ichnode ui``)."""

from ui.pages import main

main()
