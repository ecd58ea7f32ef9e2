"""ichnode's Streamlit web interface."""
