import shutil, time
import fedkit
def test_build(tmp_path, tiny_model):
    t = time.time()
    w = fedkit.build_world(tmp_path / "w", tiny_model, keys=True)
    print("build", time.time() - t)
    shutil.rmtree("/tmp/fw", ignore_errors=True)
    shutil.copytree(w.root, "/tmp/fw", symlinks=True)
    import os; print(os.environ["HF_HUB_CACHE"])
    shutil.rmtree("/tmp/fwhub", ignore_errors=True)
    shutil.copytree(os.environ["HF_HUB_CACHE"], "/tmp/fwhub", symlinks=True)
