"""The one compiled part: study/data/_jpegcrop.c, partial JPEG decoding for the CPU path's training
views (docs/imagenet.md). It needs a C compiler and libjpeg-turbo's headers, 2.0.6 or later (Debian/Ubuntu:
gcc libjpeg-dev; macOS: `brew install jpeg-turbo`, with CFLAGS/LDFLAGS pointing at it). Without them the
install still succeeds (pip does not say that the module was left out) and PIL decodes whole images, more
slowly, to the same views within 2 levels of 255."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("study.data._jpegcrop", ["study/data/_jpegcrop.c"], libraries=["jpeg"], optional=True)])
