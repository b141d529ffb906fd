"""The Gradio page's parts: how a reply is shown, the judging controls and the arena tab."""
