"""enroot's and pyxis' image reference forms, as job scripts written for pyxis use them."""
import pytest

from hpcc.errors import ReferenceError_
from hpcc.reference import parse_reference

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("text,want", [
    ("nvcr.io#nvidia/pytorch:24.01-py3", "nvcr.io/nvidia/pytorch:24.01-py3"),
    ("alice@nvcr.io#nvidia/pytorch:24.01-py3", "nvcr.io/nvidia/pytorch:24.01-py3"),
    ("docker://ubuntu", "docker.io/library/ubuntu:latest"),
    ("docker://ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
    ("docker://nvcr.io#nvidia/cuda:12.2.0-base", "nvcr.io/nvidia/cuda:12.2.0-base"),
    ("docker://bob@registry.local:5000#team/app@" + DIGEST,
     "registry.local:5000/team/app@" + DIGEST),
    ("docker.io#ubuntu", "docker.io/library/ubuntu:latest"),
    ("localhost:5000#app:1", "localhost:5000/app:1"),
])
def test_enroot_forms_name_the_same_image_as_docker_forms(text, want):
    assert str(parse_reference(text)) == want
    assert parse_reference(text) == parse_reference(want)


def test_the_part_after_hash_is_a_path_in_that_registry_never_a_host():
    ref = parse_reference("myreg.example#team/app:1")
    assert ref.domain == "myreg.example" and ref.path == "team/app"


@pytest.mark.parametrize("text", ["dockerd://ubuntu", "podman://localhost/app:1"])
def test_local_daemon_images_are_refused_in_one_line(text):
    with pytest.raises(ReferenceError_) as e:
        parse_reference(text)
    msg = str(e.value)
    assert "\n" not in msg
    assert text in msg and "not supported" in msg
    assert "save" in e.value.hint


@pytest.mark.parametrize("text,why", [
    ("nvcr.io#", "REGISTRY#IMAGE"),
    ("#nvidia/pytorch", "bad registry host"),
    ("nvcr.io#a#b", "REGISTRY#IMAGE"),
    ("docker://", "no image name"),
    ("bad_host!#x", "bad registry host"),
])
def test_malformed_enroot_forms_say_what_is_wrong(text, why):
    with pytest.raises(ReferenceError_, match=why):
        parse_reference(text)
