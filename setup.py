"Build script: reads package metadata and requirements from settings.ini, the version from biovis/__init__.py."
import re
from configparser import ConfigParser
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
cfg = ConfigParser(delimiters=['='])
cfg.read(here/'settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
version = re.search(r'^__version__\s*=\s*[\'"]([^\'"]+)', (here/'biovis'/'__init__.py').read_text(), re.M).group(1)
licenses = {'apache2': 'Apache-2.0'}  # settings.ini name -> SPDX expression
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable']
lic_name = licenses[cfg['license']]

setup(
    version=version,
    description=cfg['description'],
    long_description=(here/'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    author=cfg['author'], author_email=cfg['author_email'],
    license_expression=lic_name, url=cfg['url'], keywords=cfg['keywords'].split(),
    classifiers=[f"Development Status :: {statuses[int(cfg['status'])-1]}",
                 'Intended Audience :: Science/Research', 'Topic :: Scientific/Engineering :: Medical Science Apps.',
                 f"Programming Language :: Python :: {cfg['min_python']}"],
    packages=find_packages(include=['biovis', 'biovis.*']),
    include_package_data=True,
    install_requires=cfg['requirements'].split(),
    extras_require={'dev': cfg['dev_requirements'].split() + cfg['keras_requirements'].split() + cfg['onnx_requirements'].split()
                           + cfg['postgres_requirements'].split(),
                    'keras': cfg['keras_requirements'].split(), 'onnx': cfg['onnx_requirements'].split(),
                    'postgres': cfg['postgres_requirements'].split()},
    entry_points={'console_scripts': cfg['console_scripts'].split(),
                  'nbdev': ['biovis=biovis._modidx:d'],
                  'biovis.kinds': cfg['kinds'].split(),
                  'biovis.retrain': cfg['retrain'].split()},
    zip_safe=False,
)
