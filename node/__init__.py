"""ichnode's PACS-facing service: the SCP, scheduler, workers, DICOM result objects,
sender, command line and metrics."""
