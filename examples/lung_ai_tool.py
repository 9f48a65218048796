"""A toy AI tool: for each complete series in EXPORT_DIR, a mask into INBOX (runs until killed)."""
import os, sys, time
from pathlib import Path
import numpy as np, pydicom, yaml

export_dir, inbox = Path(sys.argv[1]), Path(sys.argv[2])
done = set()
while True:
    for manifest in sorted(export_dir.glob("[!.]*/series.yaml")):  # complete series; skip .tmp folders
        info = yaml.safe_load(manifest.read_text())
        name = f"lung-{info['series_instance_uid']}-r{info['revision']}"
        if name in done:
            continue
        try:  # series.yaml lists the files in ascending position along the slice normal
            volume = np.stack([pydicom.dcmread(manifest.parent / f).pixel_array for f in info["files"]])
        except FileNotFoundError:  # a newer revision replaced the folder meanwhile: read that one
            continue
        mask = volume > volume.mean()  # the "model"; frame k = k-th file of series.yaml
        np.save(inbox / f"{name}.npy", mask)
        sidecar = {"source": {"series_instance_uid": info["series_instance_uid"]},
                   "segments": [{"label": "bright", "algorithm_name": "lung-ai 0.1"}]}
        (inbox / f".{name}.yaml.tmp").write_text(yaml.safe_dump(sidecar))
        os.rename(inbox / f".{name}.yaml.tmp", inbox / f"{name}.yaml")  # the sidecar last, by rename
        done.add(name)
    time.sleep(0.2)
